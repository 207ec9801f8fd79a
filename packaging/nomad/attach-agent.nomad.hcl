# attach-agent on every client node of a Nomad cluster (a system job). The
# raw_exec driver runs it as root on the host, where it can enter other
# tasks' namespaces and switch users.
job "attach-agent" {
  type        = "system"
  datacenters = ["*"]

  update {
    max_parallel = 1
    stagger      = "30s"
  }

  group "agent" {
    network {
      port "metrics" { static = 9464 }
    }

    task "attach-agent" {
      driver = "raw_exec"
      # SIGTERM, then up to the grace for sessions to finish.
      kill_signal  = "SIGTERM"
      kill_timeout = "11m"

      config {
        command = "/usr/bin/attach-agent"
        args = [
          "serve",
          "--control=/run/attach-agent/control.sock",
          "--metrics-listen=${NOMAD_IP_metrics}:9464",
          "--ca=/etc/attach-agent/relay-ca.pem",
          "--log-format=json",
        ]
      }

      service {
        name     = "attach-agent-metrics"
        port     = "metrics"
        provider = "nomad"
      }

      resources {
        cpu    = 100
        memory = 64
      }
    }
  }
}
