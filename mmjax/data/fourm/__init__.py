"""The 4M objective's transform: token budgets and masking, Dirichlet mixtures, records -> batch."""
