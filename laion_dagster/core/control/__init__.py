"""What ties the rooms together: enqueue, admission, accounting, retries, status and progress."""
