"""Built-in pruning methods. Installed as `prunebench.methods`; each module registers itself."""
