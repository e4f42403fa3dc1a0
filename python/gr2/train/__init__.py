"""Training recipes, one per stage: midtrain, sft (modules) and dapo (a package, one file per concern)."""
