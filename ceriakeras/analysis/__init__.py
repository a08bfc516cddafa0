"""Analysis of image series: the run, its tables and pictures."""
