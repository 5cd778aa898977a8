"""Audio in: sources (microphone, file, array; ring buffer, resampling to the model's rate), file
reading, and the log-mel front end (offline and streaming)."""
