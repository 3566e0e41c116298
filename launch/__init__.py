"""Command line, launchers and the experiment file that ties the packages together."""
