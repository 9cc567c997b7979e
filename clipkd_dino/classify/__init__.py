"""Classification mode: distillers for CNN teacher/student pairs (KD, DKD, ReviewKD and their "++" variants)."""
