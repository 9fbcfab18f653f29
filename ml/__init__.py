"""Machine-learning examples built on miniray (the seed's distributed GAN lives here)."""
