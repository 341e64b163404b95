# Every header of polyattn (public and detail/) compiles on its own: for each one a translation
# unit that includes only that header is compiled (-fsyntax-only) with a user's strict warning
# flags and -Werror, polyattn as a plain -I, Eigen and xsimd as system headers. A header that
# leans on another header having been included first, or that warns, fails the test.
#
#   cmake -DCXX=<compiler> -DINCLUDE_DIR=<polyattn include dir> -DSYSTEM_DIRS=<dir;dir>
#         -DOPENMP=ON|OFF -DWORK_DIR=<dir> -P check_headers_alone.cmake
cmake_minimum_required(VERSION 3.21)
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

include(${CMAKE_CURRENT_LIST_DIR}/strict_flags.cmake)
set(flags ${strict_flags} -fsyntax-only -march=native)

file(GLOB_RECURSE headers RELATIVE ${INCLUDE_DIR} ${INCLUDE_DIR}/polyattn/*.hpp)
list(SORT headers)
set(failed)
foreach(header IN LISTS headers)
  string(MAKE_C_IDENTIFIER ${header} name)
  set(tu ${WORK_DIR}/${name}.cpp)
  file(WRITE ${tu} "#include <${header}>\n")
  execute_process(COMMAND ${CXX} ${flags} ${tu} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    list(APPEND failed ${header})
    message(SEND_ERROR "${header} does not compile alone:\n${out}\n${err}")
  endif()
endforeach()
list(LENGTH headers n)
if(failed)
  message(FATAL_ERROR "headers that do not compile alone: ${failed}")
endif()
message(STATUS "all ${n} headers compile alone, warning-free")
