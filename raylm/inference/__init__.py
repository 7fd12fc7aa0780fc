"""The inference floor: the generation engine (scheduler, model runner, output processing) and sampling."""
