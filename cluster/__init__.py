"""Where arpipe runs: the Ray connection, Ray Jobs submission and cluster configs."""
