"""Task families: how a family builds its model, computes its loss and evaluates (one LightningModule for all)."""
