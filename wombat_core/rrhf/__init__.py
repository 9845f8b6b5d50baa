"""RRHF (Rank Responses to align Human Feedback, arXiv 2304.05302) in plain torch: data, collation,
the loss, reward scoring and candidate generation. Ray only wraps these for scale-out (services/rrhf)."""
