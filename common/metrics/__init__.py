"""BraTS metrics: region and lesion-wise Dice and HD95 per case, score averaging, and the
evaluation of a folder of predictions.
"""
