# Makes this folder the `recipes` package when run from the project root, ahead of the unimportable
# top-level `recipes` package that the torchtune wheel installs (see README, "Running").
