"""What a trained model learned: test metrics, pictures, TensorBoard entries, sampling. Uses the parts and training."""
