"""`sae eval`: splice SAEs into the LM and measure how much of its behaviour they keep."""
