"""SignRound tuning: block walk, per-block signed-gradient loop, RTN initialisations. Never touches files."""
