"""The networks: the ResNet builder and teacher loader, the stage-feature forward, MoCo and its queue."""
