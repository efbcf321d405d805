"""Ray Tune trainables for dkd-tune: thin adapters from a trial's config to `dkd_tune.train.fit`."""
