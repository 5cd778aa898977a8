"""Serving: steppers and engines (audio blocks in, SoundEvents out), the audio-in Detector, and
the event decoder."""
