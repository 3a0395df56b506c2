"""Per-frame generator controls: head pose, camera and eye gaze sequences, and how to make them."""
