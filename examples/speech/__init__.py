"""Speech data for the examples: espeak-ng synthesis, resampling, noise, log-mel features, datasets."""
