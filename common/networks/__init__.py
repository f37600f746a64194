"""The networks: model specs and presets, feature taps and the feature projector."""
