"""Camera backends: each one file implementing the `Source` protocol for images."""
