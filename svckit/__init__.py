"""Small pieces shared by gradesvc and lbsvc: JSON resources, metrics, options."""
