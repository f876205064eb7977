"""What every run needs around the stages: the study lock, logs, progress, resource tracking, environment, estimates."""
