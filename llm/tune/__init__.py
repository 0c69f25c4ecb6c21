"""The sweep: Ray Tune over Ray Train runs of the one loop, ASHA on `step`, results and the best schedule."""
