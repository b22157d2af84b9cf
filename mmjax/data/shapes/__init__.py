"""Raw data: the synthetic shapes world (`world`) and its tfds ArrayRecord builder (`records`)."""
