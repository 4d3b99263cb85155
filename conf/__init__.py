"""The configs that ship with mwn (YAML, composed by Hydra); a package so that a wheel carries
them (installed as mwn/conf/)."""
