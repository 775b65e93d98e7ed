# Makes this folder the `recipes` package when run from the project root, ahead of the unimportable
# top-level `recipes` package that the torchtune wheel installs (README, "Running on several nodes or in one process").
