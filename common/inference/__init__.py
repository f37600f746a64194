"""Using a trained student: sliding-window inference, the model file, prediction,
explanations and rendering.
"""
