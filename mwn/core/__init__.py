"""One iteration as pure functions of explicit state: step types and state, functional
optimisers, the fp16 scale and the sums over processes, BatchNorm's rules, the models and
meta-nets, the meta-gradient methods, the baselines, the method records. Imports nothing outside
mwn.core: no config, file, clock or global RNG."""
