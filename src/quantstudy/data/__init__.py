"""Data a stage consumes: conversation sources, calibration sets, SFT data, chat rendering."""
