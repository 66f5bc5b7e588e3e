"""What the tests share: real brokers, agents, PKI, models, disks and waits."""
