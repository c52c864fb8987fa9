"""The send stage: a mail request from the queue, validated, paced, submitted to HVE and recorded."""
