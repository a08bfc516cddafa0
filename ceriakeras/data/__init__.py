"""Training data: TFRecord shards and the tf.data pipeline."""
