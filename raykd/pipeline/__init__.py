"""The pipeline of stages and the run directory they write into."""
