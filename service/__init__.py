"""BentoML prediction and admin service."""
