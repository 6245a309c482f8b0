"""What ties the rooms together: enqueue, the launch policy, accounting, retries, status
and progress."""
