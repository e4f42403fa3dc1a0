"""Training recipes, one file per stage: midtrain, sft, dapo."""
