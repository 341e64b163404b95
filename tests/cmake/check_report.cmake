# bench/report.py on a recorded sample (a subset of a real polyattn_bench run; the shaped_attention
# rows come from a later run on another machine, the machine rows from a third, the
# precision rows from a fourth, the contended rows from a fifth, with their paired 1-thread calls):
# it must write a table that names the
# crossover and a non-empty PNG; on a result file without benchmarks it must fail with an error
# message instead of drawing an empty picture.
cmake_minimum_required(VERSION 3.21)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
execute_process(COMMAND ${PYTHON} ${REPORT} ${SAMPLE} ${WORK_DIR}/ok RESULT_VARIABLE rc ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "report.py failed on the sample (${rc}): ${err}")
endif()
file(READ ${WORK_DIR}/ok/report.md md)
foreach(expected "| 4096 |" "faster than flash from N = " "flash_attention" "## Backward passes" "| flash_attention | 4096 | 64 | 1 | 2 |"
        "## Training step" "training step (r = 32, local_exact) is faster than flash"
        "performer m=256" "flash / performer" "## Non-causal attention" "flash / linformer"
        "## Shaped attention" "| shaped fwd+bwd α = 8 ms |" "Machine: one core's fp32 FMA peak"
        "## Under contention" "| flash_attention | 4096 |" "## Precision: fp32, bf16 and f16"
        "vdpbf16ps peak (one core)" "| decode step (flash, Nq = 1) | context = 32768 | 2 |"
        "one core's measured peak): 98 GFLOP/s (1 thread), 196 GFLOP/s (2 threads)")
  string(FIND "${md}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.md lacks '${expected}':\n${md}")
  endif()
endforeach()
# the contended rows' paired 1-thread columns (the median 1-thread call and the median ratio)
string(FIND "${md}" "## Under contention" at)
string(SUBSTRING "${md}" ${at} -1 contention)
if(NOT contention MATCHES "busy / paired 1 thread \\|" OR
   NOT contention MATCHES "\\| flash_attention \\| 4096 \\|[^\n]*\\| [0-9][0-9.]* \\| [0-9][0-9.]* \\|\n")
  message(FATAL_ERROR "report.md's contention table lacks the paired 1-thread columns:\n${contention}")
endif()
if(md MATCHES "not quiet")
  message(FATAL_ERROR "report.md warns of a busy machine on the quiet sample:\n${md}")
endif()
# the same results with a load average above the 2 threads: the report must warn at the top
file(READ ${SAMPLE} sample)
string(REGEX REPLACE "\"load1\": [0-9.e+-]+" "\"load1\": 3.5" busy "${sample}")
file(WRITE ${WORK_DIR}/busy.json "${busy}")
execute_process(COMMAND ${PYTHON} ${REPORT} ${WORK_DIR}/busy.json ${WORK_DIR}/busy RESULT_VARIABLE rc ERROR_VARIABLE err)
file(READ ${WORK_DIR}/busy/report.md busy_md)
string(FIND "${busy_md}" "Warning: the machine was not quiet" at)
if(NOT rc EQUAL 0 OR at EQUAL -1 OR at GREATER 400)
  message(FATAL_ERROR "report.md does not warn at its top of a load above the threads (${rc}, ${err}):\n${busy_md}")
endif()
file(SIZE ${WORK_DIR}/ok/report.png png_size)
if(png_size LESS 10000)
  message(FATAL_ERROR "report.png is suspiciously small (${png_size} bytes)")
endif()
file(WRITE ${WORK_DIR}/empty.json "{\"context\": {}, \"benchmarks\": []}")
execute_process(COMMAND ${PYTHON} ${REPORT} ${WORK_DIR}/empty.json ${WORK_DIR}/empty RESULT_VARIABLE rc ERROR_VARIABLE err)
if(rc EQUAL 0 OR NOT err MATCHES "report.py: error")
  message(FATAL_ERROR "report.py accepted a result file without benchmarks (rc ${rc}): ${err}")
endif()
if(EXISTS ${WORK_DIR}/empty/report.png)
  message(FATAL_ERROR "report.py drew a picture from no data")
endif()
