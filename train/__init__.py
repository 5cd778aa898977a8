"""Training: data sets, scene synthesis, the fit loop and evaluation."""
