"""Plain PyTorch detection: data, models, training engine, metrics, box fusion, drawing. Never imports Ray."""
