# bench/report.py on a recorded sample (a subset of a real polyattn_bench run; the shaped_attention
# rows come from a later run on another machine): it must write a table that names the
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
        "## Shaped attention" "| shaped fwd+bwd α = 8 ms |")
  string(FIND "${md}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "report.md lacks '${expected}':\n${md}")
  endif()
endforeach()
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
