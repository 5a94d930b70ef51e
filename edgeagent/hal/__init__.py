"""Hardware abstraction: cameras, sensors, accelerators and system facts."""
