"""The networks: the ResNet builder and stems, the stage-feature forward, MoCo and its queue."""
