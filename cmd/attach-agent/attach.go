package main

import "context"

func runAttach(ctx context.Context, args []string, io stdio) (int, error) { return exitAgentErr, errNotYet }
func runDemo(ctx context.Context, args []string, io stdio) (int, error)   { return exitAgentErr, errNotYet }
