"""Audio sources: synthetic labelled sounds, WAV file replay, an ALSA microphone."""
