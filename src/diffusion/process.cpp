// Noise processes: implemented in this file (placeholder until the processes land).
