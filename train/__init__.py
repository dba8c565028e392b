"""`sae train`: train BatchTopK (and TopK / ReLU-L1 / JumpReLU) SAEs from a store's shuffled chunks."""
