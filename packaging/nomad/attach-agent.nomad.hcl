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
      # Nomad ends every process of a stopped task, so sessions cannot
      # outlive it: on SIGTERM the agent drains (--on-sigterm=drain) for its
      # grace, then ends what is left with reason shutdown, inside
      # kill_timeout.
      kill_signal  = "SIGTERM"
      kill_timeout = "11m"

      config {
        command = "/usr/bin/attach-agent"
        args = [
          "serve",
          "--on-sigterm=drain",
          "--shutdown-grace=10m",
          "--control=/run/attach-agent/control.sock",
          "--state-dir=/run/attach-agent",
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
