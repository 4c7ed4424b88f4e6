"""Can this heatmap be trusted? The model-randomisation sanity check (`sanity`), the shortcut audit
(`audit`), and the weight randomisation they share (`randomize`)."""
