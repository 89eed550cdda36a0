"""Running on smaller cards: stage-level model moves, DiT block streaming and the peak-memory plan."""
